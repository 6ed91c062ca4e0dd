"""Communication backends behind ``moe_ep.comm.Buffer``: ``reference`` (torch.distributed) and ``cuda``."""
