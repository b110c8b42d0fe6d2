# meshgen in the www container: the minimal policy measured on Consul 1.8.7 (README, "The token a
# sidecar needs"), for www with its upstream redis.
service "www-sidecar-proxy" { policy = "read" }
service "www" { policy = "write" }
service_prefix "redis" { policy = "read" }
node_prefix "" { policy = "read" }
