"""bench/service.py reads wrk's summary; a misread would put wrong figures into docs/benchmarks.md."""

from bench.service import parse_wrk

# wrk 4.1's output (Debian's package) for a route answering 404, with a socket error line added
WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:9555/moto-api/nonexistent
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.99ms    3.93ms  36.63ms   93.53%
    Req/Sec     0.85k   156.04     1.06k    60.00%
  Latency Distribution
     50%  850.00us
     75%    2.40ms
     90%    5.59ms
     99%    1.20s
  850 requests in 1.01s, 348.63KB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 850
Requests/sec:    844.54
Transfer/sec:    346.39KB
"""


def test_parse_wrk_reads_rate_percentiles_and_every_error() -> None:
    assert parse_wrk(WRK_OUTPUT) == {"rps": 844.54, "requests": 850, "p50_ms": 0.85, "p99_ms": 1200.0,
                                     "errors": 855}


def test_a_clean_run_has_no_errors() -> None:
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 3\n", "").replace(
        "  Non-2xx or 3xx responses: 850\n", "")
    assert parse_wrk(clean)["errors"] == 0
