"""The job's bookkeeping in Redis: item states and counters (`job`), message leases (`leases`),
waiting out a lost broker or disk (`retries`), failed items and their reasons (`failures`)."""
