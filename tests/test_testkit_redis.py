import socket

from apigw.testkit.redis import RedisServer


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16)


def test_redis_server_restarts_on_same_port(redis_server: RedisServer) -> None:
    assert _ping(redis_server.port) == b"+PONG\r\n"
    port = redis_server.port
    redis_server.restart()
    assert redis_server.port == port
    assert _ping(port) == b"+PONG\r\n"
