"""The one-machine cluster: a dev-stack stand-in for Kubernetes and Istio (its pods are
local processes, its data plane is nginx configured from the applied Istio objects)."""
