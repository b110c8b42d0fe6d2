# meshgen in the redis container: the minimal policy measured on Consul 1.8.7 (README, "The token
# a sidecar needs"), for redis, which has no upstream.
service "redis-sidecar-proxy" { policy = "read" }
service "redis" { policy = "write" }
node_prefix "" { policy = "read" }
