# The Consul client agent in the redis container: its own node, and the service and sidecar it
# registers from /etc/consul.d.
node "redis" { policy = "write" }
service "redis" { policy = "write" }
service "redis-sidecar-proxy" { policy = "write" }
