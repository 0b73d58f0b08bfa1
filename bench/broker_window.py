"""Does a broker lose a message when its consumer is SIGKILLed? Count it, for Redis and AMQP.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged with a second
command (``QoS.append``: ZADD + HSET). A consumer killed between the two loses that message: it is
neither in the queue nor in the ``unacked`` hash, so no visibility-timeout restore brings it back.
AMQP keeps every unacknowledged message on the server and requeues it when the connection dies.

This script publishes N numbered messages, runs a bare kombu consumer (acks after writing the
number to a file) and SIGKILLs it K times at random moments, then drains with a last consumer and
counts the numbers never seen. Usage::

    .venv/bin/python bench/broker_window.py --broker redis --prefetch 100
    .venv/bin/python bench/broker_window.py --broker amqp --prefetch 100   # local RabbitMQ, own vhost
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kombu import Connection, Consumer, Exchange, Queue

QUEUE = Queue("window", Exchange("window", type="direct"), routing_key="window")
#: Transport options: a short visibility timeout so the Redis restore happens within the run, s.
OPTIONS = {"visibility_timeout": 2, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}


def consume(url: str, seen_path: str, prefetch: int) -> None:
    """The consumer process: append each message's number to ``seen_path``, then ack."""
    fd = os.open(seen_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def on_message(body: object, message: object) -> None:
        os.write(fd, f"{body}\n".encode())
        message.ack()  # type: ignore[attr-defined]

    with Connection(url, transport_options=OPTIONS) as conn, Consumer(
        conn, [QUEUE], callbacks=[on_message], prefetch_count=prefetch
    ):
        while True:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)


def seen(path: Path) -> set[int]:
    return {int(x) for x in path.read_text().split()} if path.exists() else set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    parser.add_argument("--prefetch", type=int, default=100, help="consumer prefetch count")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="broker-window-"))
    seen_path = workdir / "seen.txt"
    cleanup: list[list[str]] = []
    server = None
    if args.broker == "redis":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
    else:
        vhost = f"broker-window-{uuid.uuid4().hex[:8]}"
        subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
        grant = ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]
        subprocess.run(grant, check=True, capture_output=True)
        cleanup.append(["rabbitmqctl", "delete_vhost", vhost])
        url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    try:
        with Connection(url, transport_options=OPTIONS) as conn:
            conn.ensure_connection(max_retries=50, interval_start=1, interval_step=1)
            producer = conn.Producer(serializer="json")
            for number in range(args.messages):
                producer.publish(number, exchange=QUEUE.exchange, routing_key="window", declare=[QUEUE])
        rng = random.Random(args.seed)
        consumer_argv = [sys.executable, __file__, "--consume", url, str(seen_path), str(args.prefetch)]
        for _ in range(args.kills):
            child = subprocess.Popen(consumer_argv)
            time.sleep(0.4 + rng.random() * 0.3)  # a random moment mid-stream
            child.send_signal(signal.SIGKILL)
            child.wait()
        last = subprocess.Popen(consumer_argv)
        deadline = time.monotonic() + 120
        previous, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:  # until everything is seen, or nothing new for 10 s
            count = len(seen(seen_path))
            if count >= args.messages:
                break
            if count != previous:
                previous, stable_since = count, time.monotonic()
            elif time.monotonic() - stable_since > 10:
                break
            time.sleep(0.5)
        last.kill()
        lost = args.messages - len(seen(seen_path))
        print(
            f"{args.broker}, prefetch {args.prefetch}: {args.messages} messages, {args.kills} SIGKILLs "
            f"of the consumer, lost {lost}"
        )
        return 0
    finally:
        if server is not None:
            server.kill()
        for argv in cleanup:
            subprocess.run(argv, capture_output=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--consume":
        consume(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(main())
