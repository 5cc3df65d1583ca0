"""The one-machine cluster: what stands in for Kubernetes and Istio where no API server, kubelet,
container runtime or Envoy can run: the API server (``kube``), the pod runner (``pods``: pods as
model-server processes), the data plane (``dataplane``: nginx configured from the applied Istio
objects), and ``cluster``, which runs them with Prometheus and an S3 API (``python -m
devstack.cluster``)."""
