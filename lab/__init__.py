"""The lab: a simulated GPU fleet (NVML, kubelet, device plugin, Kubernetes API) on one machine.

Not shipped with the collection (galaxy.yml build_ignore). See docs/LAB.md.
"""
