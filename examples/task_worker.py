"""The classic task_worker.py on jobbroker: square the numbers the master hands out.

Start as many as you like, on any machine that can reach the broker; Ctrl-C stops one
cleanly (jobs it holds are finished or handed back).
"""

import asyncio

from jobbroker import Worker


def square(n: int) -> int:
    return n * n


if __name__ == "__main__":
    worker = Worker(queues=["squares"], handler=square, concurrency=4, handle_signals=True)
    asyncio.run(worker.run())
