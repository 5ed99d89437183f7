"""cellfleet's lab toolkit: `lab` reaches the lab's VMs and HAProxy, `load` drives steady loads through the
load balancer, `sending` ships the scripts in tests/remote to a VM."""
