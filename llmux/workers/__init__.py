"""Several data-plane processes beside one controller (`[server] workers`): see channel.py."""
