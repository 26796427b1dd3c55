#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_lease
short_description: Hold or release the per-node remediation lease, so two runs never remediate one node at once
version_added: 0.1.0
description:
  - Manages one C(coordination.k8s.io/v1) Lease per node, named O(name_prefix) followed by the
    node name, in O(namespace). A run remediates a node only while it holds that node's lease.
  - A lease is held while its C(holderIdentity) is set and C(renewTime + leaseDurationSeconds)
    lies in the future (without C(renewTime), C(acquireTime) counts; without C(leaseDurationSeconds),
    O(lease_duration_seconds) counts). A lease with neither time is treated as lapsed.
  - With O(state=acquired) the module creates the lease when it is missing; renews it when
    O(holder_identity) holds it; takes it over when it is free or lapsed (C(acquireTime) set to now,
    C(leaseTransitions) plus one); and leaves it alone when someone else holds it. In that last case
    the task does not fail, it returns RV(acquired=false), the holder and when the lease lapses, so
    the calling role can skip the node.
  - With O(state=released) the module deletes the lease when O(holder_identity) holds it (lapsed or
    not). A lease held by someone else, or no lease, is left as it is.
  - Every write is guarded by the resourceVersion that was read (create fails when the lease already
    exists; replace and delete carry the resourceVersion). Of two runs that race for the same lease,
    exactly one wins; the other gets a conflict, reads the lease again and reports it held by the winner.
  - Expiry compares the lease's times with this controller's clock; keep controller clocks in sync
    (NTP), as for any Lease user.
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.k8s_auth_options
  - gpunode.bringup.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reads the lease and reports what would happen; the write it would make is sent as a
        server-side dry run (C(dryRun=All)), so nothing is stored.
  diff_mode:
    support: full
    details: Shows the holder and expiry before and after when the holder changes.
  idempotent:
    support: full
    details:
      - Acquiring a lease this holder already holds renews it (a write of C(renewTime)) and reports
        no change; releasing an absent lease reports no change.
options:
  node:
    description:
      - Name of the node the lease guards.
    type: str
    required: true
  state:
    description:
      - V(acquired) holds the lease for O(holder_identity); V(released) gives it back.
    type: str
    choices: [acquired, released]
    default: acquired
  namespace:
    description:
      - Namespace of the Lease objects.
    type: str
    default: kube-system
  name_prefix:
    description:
      - Prefix of the lease name; the lease of node C(gpu-07) is C(<name_prefix>gpu-07).
      - The whole name must be a valid object name (lowercase letters, digits, C(-) and C(.)).
    type: str
    default: gpunode-bringup-
  holder_identity:
    description:
      - Who holds the lease, stored as C(holderIdentity).
      - Defaults to C(<controller hostname>-<process id>), which is different for every task. Pass
        the same value to every task of one run (the playbooks pass a per-run id), or register the
        acquiring task and pass its RV(holder_identity) to the releasing one.
    type: str
  lease_duration_seconds:
    description:
      - How long the lease stays held after each acquisition or renewal, stored as C(leaseDurationSeconds).
      - A run that dies without releasing blocks the node for at most this long.
    type: int
    default: 600
notes:
  - Needs C(get), C(create), C(update) and C(delete) on C(leases) in the C(coordination.k8s.io) API group
    in O(namespace).
  - Renewing is a write, but it does not change who holds the node, so it reports C(changed=false)
    with RV(renewed=true).
  - Releasing deletes the Lease object (rather than clearing C(holderIdentity)), so no lease
    objects accumulate for retired nodes. C(leaseTransitions) therefore counts take-overs of
    lapsed leases since the lease was last created.
seealso:
  - name: Leases
    description: Kubernetes documentation of the Lease object.
    link: https://kubernetes.io/docs/concepts/architecture/leases/
"""

EXAMPLES = r"""
- name: Hold the remediation lease of this node for the run
  gpunode.bringup.node_lease:
    node: "{{ inventory_hostname }}"
    holder_identity: "{{ gpunode_run_id }}"
  delegate_to: localhost
  register: gpunode_lease

- name: Skip this node while another run remediates it
  ansible.builtin.meta: end_host
  when: not gpunode_lease.acquired

- name: Release the lease at the end of the run
  gpunode.bringup.node_lease:
    node: "{{ inventory_hostname }}"
    holder_identity: "{{ gpunode_lease.holder_identity }}"
    state: released
  delegate_to: localhost

- name: A short lease in a dedicated namespace, with a kubeconfig
  gpunode.bringup.node_lease:
    node: gpu-07
    namespace: gpu-ops
    lease_duration_seconds: 120
    holder_identity: awx-job-4711
    kubeconfig: ~/.kube/config
"""

RETURN = r"""
acquired:
  description:
    - With O(state=acquired), whether O(holder_identity) holds the lease after the task (would hold it, in check mode).
    - False when someone else holds it; RV(holder), RV(expires_at) and RV(expires_in) then say who and until when.
    - Always false with O(state=released).
  returned: always
  type: bool
  sample: true
renewed:
  description: Whether the lease was already held by O(holder_identity) and its C(renewTime) was moved to now.
  returned: always
  type: bool
  sample: false
taken_over:
  description: Whether the lease was free or lapsed and O(holder_identity) took it over.
  returned: always
  type: bool
  sample: false
released:
  description: With O(state=released), whether the lease was deleted (would be, in check mode).
  returned: always
  type: bool
  sample: false
holder:
  description: Who holds the lease after the task; null when nobody holds it (absent, released or lapsed).
  returned: always
  type: str
  sample: awx-job-4711
holder_identity:
  description: The identity this task acted for (O(holder_identity) or its default).
  returned: always
  type: str
  sample: ctl-01-48213
expires_at:
  description: When the lease lapses unless renewed (RFC 3339, UTC); null when nobody holds it.
  returned: always
  type: str
  sample: "2026-01-01T10:10:00.000000Z"
expires_in:
  description: Seconds until the lease lapses; null when nobody holds it.
  returned: always
  type: int
  sample: 600
lease:
  description: The Lease after the task (as it would be, in check mode); empty when there is none.
  returned: always
  type: dict
  contains:
    name:
      description: Name of the Lease.
      type: str
      sample: gpunode-bringup-gpu-07
    namespace:
      description: Namespace of the Lease.
      type: str
      sample: kube-system
    holder_identity:
      description: C(spec.holderIdentity).
      type: str
      sample: awx-job-4711
    lease_duration_seconds:
      description: C(spec.leaseDurationSeconds).
      type: int
      sample: 600
    acquire_time:
      description: C(spec.acquireTime).
      type: str
      sample: "2026-01-01T10:00:00.000000Z"
    renew_time:
      description: C(spec.renewTime).
      type: str
      sample: "2026-01-01T10:00:00.000000Z"
    lease_transitions:
      description: C(spec.leaseTransitions).
      type: int
      sample: 0
    expires_at:
      description: When the lease lapses unless renewed.
      type: str
      sample: "2026-01-01T10:10:00.000000Z"
    expires_in:
      description: Seconds until it lapses; null when lapsed.
      type: int
      sample: 600
    held:
      description: Whether the lease is held (holder set and not lapsed).
      type: bool
      sample: true
msg:
  description: What happened, naming the node and the lease.
  returned: always
  type: str
  sample: "node gpu-07 is being remediated by awx-job-4711 until 2026-01-01T10:10:00.000000Z; skipped"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import auth_argument_spec
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import run_api_module
from ansible_collections.gpunode.bringup.plugins.module_utils._lease import (
    LeaseRequest,
    default_holder_identity,
    run_node_lease,
)


def main():
    module = AnsibleModule(
        argument_spec=auth_argument_spec(dict(
            node=dict(type="str", required=True),
            state=dict(type="str", choices=["acquired", "released"], default="acquired"),
            namespace=dict(type="str", default="kube-system"),
            name_prefix=dict(type="str", default="gpunode-bringup-"),
            holder_identity=dict(type="str"),
            lease_duration_seconds=dict(type="int", default=600),
        )),
        supports_check_mode=True,
    )
    params = module.params
    request = LeaseRequest(
        node=params["node"],
        namespace=params["namespace"],
        name_prefix=params["name_prefix"],
        holder_identity=params["holder_identity"] or default_holder_identity(),
        lease_duration_seconds=params["lease_duration_seconds"],
    )

    def body(client):
        request.validate()
        return run_node_lease(client, request, params["state"], module.check_mode)

    run_api_module(module, body)


if __name__ == "__main__":
    main()
