"""The one-machine cluster: what stands in for Kubernetes where no API server, kubelet or
container runtime can run (the API server ``kube``, the pod runner ``pods``, the data plane).
"""
