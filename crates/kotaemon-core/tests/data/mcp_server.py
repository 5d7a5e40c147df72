"""MCP test server for kotaemon-core's integration tests (tests/it/mcp.rs), built on the
reference Python SDK (`mcp`, FastMCP).

    python mcp_server.py stdio            # MCP over stdin/stdout
    python mcp_server.py http PORT        # streamable HTTP on http://127.0.0.1:PORT/mcp
"""

import os
import sys

from mcp.server.fastmcp import Context, FastMCP
from mcp.types import ToolAnnotations

ROOMS = {"三楼会议室": "occupied until 15:00", "lobby": "free"}


def build(port: int) -> FastMCP:
    mcp = FastMCP("kotaemon-test", host="127.0.0.1", port=port, log_level="WARNING")

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def add(a: int, b: int) -> int:
        """Adds two integers."""
        return a + b

    @mcp.tool()
    def room_status(room: str) -> str:
        """Whether a meeting room is free."""
        return f"{room}: {ROOMS.get(room, 'unknown room')}"

    @mcp.tool()
    def fail(reason: str) -> str:
        """Always fails with the given reason."""
        raise ValueError(f"refused: {reason}")

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False))
    def switch_light(room: str, on: bool) -> str:
        """Switches the light of a room."""
        return f"light in {room} is {'on' if on else 'off'}"

    # Not a valid OpenAI function name: the client skips it.
    @mcp.tool(name="get.weather")
    def get_weather() -> str:
        """A tool the client must skip."""
        return "sunny"

    @mcp.tool()
    def hidden() -> str:
        """Left out by the test's `allow` list when it uses one."""
        return "hidden"

    @mcp.tool()
    async def enable_extra(ctx: Context) -> str:
        """Adds the `extra` tool and tells the client that the tool list changed."""

        def extra() -> str:
            """Appears after enable_extra."""
            return "extra"

        if "extra" not in [t.name for t in await mcp.list_tools()]:
            mcp.add_tool(extra, name="extra")
        await ctx.session.send_tool_list_changed()
        return "enabled"

    @mcp.tool()
    def crash() -> str:
        """Exits the server process at once (the client must notice and reconnect)."""
        os._exit(3)

    @mcp.tool()
    def header(name: str, ctx: Context) -> str:
        """The value of a request header (HTTP only)."""
        request = ctx.request_context.request
        if request is None:
            return ""
        return request.headers.get(name, "")

    return mcp


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "stdio":
        build(0).run("stdio")
    elif len(sys.argv) == 3 and sys.argv[1] == "http":
        build(int(sys.argv[2])).run("streamable-http")
    else:
        sys.exit(f"usage: {sys.argv[0]} stdio | http PORT")


if __name__ == "__main__":
    main()
