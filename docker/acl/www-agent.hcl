# The Consul client agent in the www container: its own node, and the service and sidecar it
# registers from /etc/consul.d.
node "www" { policy = "write" }
service "www" { policy = "write" }
service "www-sidecar-proxy" { policy = "write" }
