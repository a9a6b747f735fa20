-- PATCH with If-Match, as a CloudCasa client edits an item.
wrk.method = "PATCH"
wrk.body = '{"name":"renamed"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["If-Match"] = '"bench-etag-0001"'
