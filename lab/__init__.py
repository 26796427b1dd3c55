"""The lab: the real Kubernetes control plane and NVIDIA's real device plugin, on simulated GPU
nodes (kubelet, container runtime and NVML simulated), on one machine.

Not shipped with the collection (galaxy.yml build_ignore). See docs/LAB.md.
"""
