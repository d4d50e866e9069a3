"""The Infernet control plane, node side: the signed client, the node key, the heartbeat's specs,
heartbeats, and the progress and arguments of remote commands."""
