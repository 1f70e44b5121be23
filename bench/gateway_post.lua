-- wrk script: POST the JSON body in the BENCH_BODY environment variable to every request.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
