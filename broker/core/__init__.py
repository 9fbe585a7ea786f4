"""The job state, pure: queues, leases, deadlines, retries. Every mutator takes `now`; nothing
here does I/O, reads a clock or imports asyncio."""
