"""What a PLC does over OPC UA in the tests: wait for the station's server, trigger a part
as the user, and read the answer back (asyncua)."""

import asyncio
import json
import socket


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"opc.tcp://127.0.0.1:{s.getsockname()[1]}"


async def wait_for_server(endpoint: str, tries: int = 100):
    """The server starts with the run: connect until it answers."""
    from asyncua import Client, ua

    for _ in range(tries):
        try:
            async with Client(endpoint):
                return
        except (OSError, asyncio.TimeoutError, ua.UaError):
            await asyncio.sleep(0.1)


async def trigger_and_wait(endpoint: str, station: str, part_id: str, user: str, password: str,
                           polls: int = 100) -> tuple:
    """Call Trigger(part_id) as the user; (what the call returned, the LastAnswer that names
    the part, or None when none came within `polls` reads 0.05 s apart)."""
    from asyncua import Client

    from lineside.runtime.opcua import NAMESPACE

    client = Client(endpoint)
    client.set_user(user)
    client.set_password(password)
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)
        node = await client.nodes.objects.get_child([f"{idx}:{station}"])
        returned = await node.call_method(await node.get_child([f"{idx}:Trigger"]), part_id)
        answer = await node.get_child([f"{idx}:LastAnswer"])
        for _ in range(polls):
            text = await answer.read_value()
            if text and json.loads(text)["part_id"] == part_id:
                return returned, json.loads(text)
            await asyncio.sleep(0.05)
    return returned, None
