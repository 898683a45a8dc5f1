"""Rendezvous for ranks spawned by a test, without the race of picking a free port and binding it later.

The test process hosts each process group's TCPStore on a port the OS assigns (and keeps it bound), and the ranks
connect to it as clients: what torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE). A port found free and handed
on instead can be taken by another process on a busy machine before rank 0 listens on it (EADDRINUSE)."""
import torch.distributed as dist

HOST = "127.0.0.1"


def hosted_store() -> dist.TCPStore:
    """A store server on HOST at a port the OS picked; keep the object alive while the ranks use it (`.port`)."""
    return dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)


def rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun sets for rank `rank` of `world` on this machine: the agent's store at `port`, gloo on the
    loopback interface only."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": HOST, "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}


def client_store(port: int) -> dist.TCPStore:
    """A rank's connection to a store from `hosted_store`."""
    return dist.TCPStore(HOST, port, is_master=False)
