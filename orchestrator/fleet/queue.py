"""The Redis side of the job queue: key names, the connection, and the scripts that act on one
job atomically (renew a lease only while we own it; write the result once, acknowledge, notify).

Layout (``P`` = :data:`PREFIX`)::

    P:jobs                  stream of jobs: fields id, body (the POST /jobs JSON), submitted_at
    P:jobs:dead             dead-letter stream: id, body, error, attempts, machine
    P:job:{id}:result       the one terminal result (JSON), written with SET NX
    P:job:{id}:done         a list the client BLPOPs: one element once the result exists
    P:job:{id}:error        the last error of an attempt (what the dead letter carries)
    P:job:{id}:completions  how many attempts reached a terminal answer (1 when nothing ran twice)
    P:machine:{id}          a machine's heartbeat hash, expiring after FLEET_HEARTBEAT_TTL
"""

from __future__ import annotations

from typing import Any

import redis

from orchestrator.core.errors import ConfigError, OrchestratorError

PREFIX = "orchestrator"
STREAM = f"{PREFIX}:jobs"
DEAD_STREAM = f"{STREAM}:dead"
GROUP = "workers"
MACHINE_PREFIX = f"{PREFIX}:machine:"
SOCKET_TIMEOUT = 30.0  # seconds


class QueueError(OrchestratorError):
    """The Redis job queue cannot be reached or answered an error."""


def result_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:result"


def done_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:done"


def error_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:error"


def completions_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:completions"


def machine_key(machine_id: str) -> str:
    return f"{MACHINE_PREFIX}{machine_id}"


def connect(url: str, *, name: str = "JOB_QUEUE_URL", ping: bool = True) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// or unix://), checked with a PING unless ``ping`` is False.

    Raises:
        ConfigError: no URL, or one that is not a Redis URL (the message never holds the URL:
            it may carry a password).
        QueueError: the server does not answer.
    """
    if not url:
        raise ConfigError(f"{name} is not set: give the Redis job queue as redis://[:password@]host:port/db")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"invalid {name}: expected redis://[:password@]host:port/db, rediss://… or unix://…")
    try:
        # Blocking reads (BLPOP, XREADGROUP BLOCK) stay well under the socket timeout (redis-py 8: 5 s
        # by default).
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT,
            health_check_interval=30,
        )
        if ping:
            client.ping()
    except ValueError as exc:
        raise ConfigError(f"invalid {name}: {type(exc).__name__} while parsing it") from None
    except redis.AuthenticationError:
        raise QueueError(f"the Redis job queue ({name}) refused the password") from None
    except redis.RedisError as exc:
        raise QueueError(f"the Redis job queue ({name}) does not answer: {type(exc).__name__}") from None
    return client


def ensure_group(client: redis.Redis) -> None:
    """The stream and its consumer group (created at the start of the stream if missing)."""
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# Renew a lease: reset the entry's idle time, but only while this consumer still owns it (another
# machine may have reclaimed it after a stall). KEYS: stream. ARGV: group, id, consumer.
RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""

# Finish a job: the result once (SET NX), acknowledge and drop the entry, count the completion,
# wake the client. KEYS: stream, result, done, completions. ARGV: group, id, result JSON, ttl,
# counts (1: an attempt reached a terminal answer). Returns 1 when this call wrote the result.
FINISH = """
local written = redis.call('SET', KEYS[2], ARGV[3], 'NX', 'EX', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[5] == '1' then
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
if written then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  return 1
end
return 0
"""


def finish(
    client: redis.Redis, msg_id: str, job_id: str, result: str, ttl: int, *, completed: bool
) -> bool:
    """Write ``result`` as the job's terminal result unless one exists, and acknowledge the entry."""
    keys = [STREAM, result_key(job_id), done_key(job_id), completions_key(job_id)]
    args: list[Any] = [GROUP, msg_id, result, max(1, ttl), "1" if completed else "0"]
    return bool(client.eval(FINISH, len(keys), *keys, *args))


def renew(client: redis.Redis, msg_id: str, consumer: str) -> bool:
    """Reset the lease of ``msg_id``; False when this consumer no longer owns it."""
    return bool(client.eval(RENEW, 1, STREAM, GROUP, msg_id, consumer))
