"""The classic task_master.py on jobbroker: hand out ten numbers, collect their squares.

Run the broker (`make run`), one or more workers (`python examples/task_worker.py`), then this.
"""

import asyncio
import random

from jobbroker import Client


async def main() -> None:
    # Address: $JOBBROKER_CONNECT or 127.0.0.1:7878. Secret: the file the broker generated.
    async with Client() as client:
        numbers = [random.randint(0, 10_000) for _ in range(10)]
        job_ids = await client.submit_many("squares", numbers)
        for number, job_id in zip(numbers, job_ids, strict=True):
            print(f"{number} squared is {await client.result(job_id, timeout=30)}")


if __name__ == "__main__":
    asyncio.run(main())
