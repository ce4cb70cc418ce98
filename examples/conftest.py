# The examples run against the embedded simulator (the default server).
# Point them at a real server with --infmax-endpoint URL, or start one with
# --infmax-server-command "vllm serve MODEL --host {host} --port {port}".
