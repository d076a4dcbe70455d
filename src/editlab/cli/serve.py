"""`editlab serve`: the web playground (`editlab.serve`) on one model.

Host, port and model are checked before the model is loaded: a host other than this machine needs
`--allow-remote` (and is warned about: anyone who reaches the port can edit the model and write files
through save), and a port already in use is refused at once."""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated

import typer

from ..errors import OptionError
from .common import check_model_options, console, load_model, print_warning
from .options import ModelOptions, with_option_groups

LOCAL_HOSTS = ("localhost",)


def _is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int) -> None:
    """The server can listen on host:port (a valid host, a free port); `OptionError` otherwise."""
    if not 1 <= port <= 65535:
        raise OptionError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OptionError(f"--host {host!r} cannot be resolved: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise OptionError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None


@with_option_groups
def serve(model: ModelOptions = ModelOptions(),
          host: Annotated[str, typer.Option(help="Address to listen on (this machine only by default)")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
          allow_remote: Annotated[bool, typer.Option(
              help="Allow a --host other than this machine: whoever reaches it can edit the model")] = False) -> None:
    """Start the web playground: edit a fact, see what moved, undo it (JSON API at /docs)."""
    if not _is_local(host) and not allow_remote:
        raise OptionError(f"--host {host} is reachable from other machines; pass --allow-remote to serve there anyway")
    check_model_options(model)
    check_bind(host, port)
    if not _is_local(host):
        print_warning(f"serving on {host}: anyone who can reach port {port} can edit the model and save files on this machine")
    import uvicorn

    from ..serve import Playground, create_app

    lm = load_model(model)
    playground = Playground(lm)
    with console.status("preparing rome (the page's default method)"):
        playground.prepare("rome")
    app = create_app(playground)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"editlab playground on [bold]http://{shown}:{port}/[/] ({lm.name}); API docs at /docs; Ctrl-C stops it")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        playground.close()
