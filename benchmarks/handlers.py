"""Handlers for benchmark workers."""


async def square(n: int) -> int:
    return n * n
