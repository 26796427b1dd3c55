"""The upstream field tables of the two kubelet contracts, written out by hand.

Each line: ``Message.field number label type`` (type is a scalar name or the message type).
Sources: k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto and
k8s.io/kubelet/pkg/apis/podresources/v1/api.proto (Kubernetes v1.32). A proto in plugin_src
that renames, renumbers or retypes a field no longer matches these tables.
"""

DEVICEPLUGIN_V1BETA1 = """
DevicePluginOptions.pre_start_required 1 optional bool
DevicePluginOptions.get_preferred_allocation_available 2 optional bool
RegisterRequest.version 1 optional string
RegisterRequest.endpoint 2 optional string
RegisterRequest.resource_name 3 optional string
RegisterRequest.options 4 optional DevicePluginOptions
ListAndWatchResponse.devices 1 repeated Device
TopologyInfo.nodes 1 repeated NUMANode
NUMANode.ID 1 optional int64
Device.ID 1 optional string
Device.health 2 optional string
Device.topology 3 optional TopologyInfo
PreStartContainerRequest.devices_ids 1 repeated string
PreferredAllocationRequest.container_requests 1 repeated ContainerPreferredAllocationRequest
ContainerPreferredAllocationRequest.available_deviceIDs 1 repeated string
ContainerPreferredAllocationRequest.must_include_deviceIDs 2 repeated string
ContainerPreferredAllocationRequest.allocation_size 3 optional int32
PreferredAllocationResponse.container_responses 1 repeated ContainerPreferredAllocationResponse
ContainerPreferredAllocationResponse.deviceIDs 1 repeated string
AllocateRequest.container_requests 1 repeated ContainerAllocateRequest
ContainerAllocateRequest.devices_ids 1 repeated string
CDIDevice.name 1 optional string
AllocateResponse.container_responses 1 repeated ContainerAllocateResponse
ContainerAllocateResponse.envs 1 repeated EnvsEntry
ContainerAllocateResponse.mounts 2 repeated Mount
ContainerAllocateResponse.devices 3 repeated DeviceSpec
ContainerAllocateResponse.annotations 4 repeated AnnotationsEntry
ContainerAllocateResponse.cdi_devices 5 repeated CDIDevice
Mount.container_path 1 optional string
Mount.host_path 2 optional string
Mount.read_only 3 optional bool
DeviceSpec.container_path 1 optional string
DeviceSpec.host_path 2 optional string
DeviceSpec.permissions 3 optional string
"""

DEVICEPLUGIN_V1BETA1_EMPTY = ["Empty", "PreStartContainerResponse"]

DEVICEPLUGIN_V1BETA1_SERVICES = {
    "Registration": {"Register": ("RegisterRequest", "Empty", False)},
    "DevicePlugin": {
        "GetDevicePluginOptions": ("Empty", "DevicePluginOptions", False),
        "ListAndWatch": ("Empty", "ListAndWatchResponse", True),
        "GetPreferredAllocation": ("PreferredAllocationRequest", "PreferredAllocationResponse", False),
        "Allocate": ("AllocateRequest", "AllocateResponse", False),
        "PreStartContainer": ("PreStartContainerRequest", "PreStartContainerResponse", False),
    },
}

PODRESOURCES_V1 = """
AllocatableResourcesResponse.devices 1 repeated ContainerDevices
AllocatableResourcesResponse.cpu_ids 2 repeated int64
AllocatableResourcesResponse.memory 3 repeated ContainerMemory
ListPodResourcesResponse.pod_resources 1 repeated PodResources
PodResources.name 1 optional string
PodResources.namespace 2 optional string
PodResources.containers 3 repeated ContainerResources
ContainerResources.name 1 optional string
ContainerResources.devices 2 repeated ContainerDevices
ContainerResources.cpu_ids 3 repeated int64
ContainerResources.memory 4 repeated ContainerMemory
ContainerResources.dynamic_resources 5 repeated DynamicResource
ContainerMemory.memory_type 1 optional string
ContainerMemory.size 2 optional uint64
ContainerMemory.topology 3 optional TopologyInfo
ContainerDevices.resource_name 1 optional string
ContainerDevices.device_ids 2 repeated string
ContainerDevices.topology 3 optional TopologyInfo
TopologyInfo.nodes 1 repeated NUMANode
NUMANode.ID 1 optional int64
DynamicResource.class_name 1 optional string
DynamicResource.claim_name 2 optional string
DynamicResource.claim_namespace 3 optional string
DynamicResource.claim_resources 4 repeated ClaimResource
ClaimResource.cdi_devices 1 repeated CDIDevice
CDIDevice.name 1 optional string
GetPodResourcesRequest.pod_name 1 optional string
GetPodResourcesRequest.pod_namespace 2 optional string
GetPodResourcesResponse.pod_resources 1 optional PodResources
"""

PODRESOURCES_V1_EMPTY = ["AllocatableResourcesRequest", "ListPodResourcesRequest"]

PODRESOURCES_V1_SERVICES = {
    "PodResourcesLister": {
        "List": ("ListPodResourcesRequest", "ListPodResourcesResponse", False),
        "GetAllocatableResources": ("AllocatableResourcesRequest", "AllocatableResourcesResponse", False),
        "Get": ("GetPodResourcesRequest", "GetPodResourcesResponse", False),
    },
}
