#!/usr/bin/env python3
"""A local stand-in for a SageMaker endpoint running the built-in XGBoost algorithm, for tests.

    python3 deploy/sagemaker/local_endpoint.py --model DIR/model.tar.gz [--host 127.0.0.1] [--port 8080]

It speaks the SageMaker runtime's InvokeEndpoint route, `POST /endpoints/{name}/invocations`, as
the XGBoost container answers it: `text/csv` rows in (no header, no label column); out, by the
Accept header, `application/json` ({"predictions": [{"score": [...]}, ...]}) or `text/csv` (one
line per row). It serves the packed model with the real xgboost library. Errors come back as the
runtime sends them: an `x-amzn-ErrorType` header and a JSON message; a body that is not numeric
CSV is a ModelError (424), as the container's failure is. Request signatures are not checked.

For tests, an endpoint named `unavailable-*` answers 503 ServiceUnavailable, one named
`throttled-*` 429 ThrottlingException, one named `broken-*` 424 ModelError for the container's
400 (its answer to the input), one named `crashing-*` 424 ModelError for the container's 500
(out of memory, restarting), one named `missing-*` 400 ValidationError as for an endpoint that
does not exist, one named `denied-*` 403 AccessDeniedException, and one named `gateway-*` a 504
without an error type (as a load balancer's timeout comes back), so clients' handling of those
can be exercised.
"""

import argparse
import io
import json
import os
import re
import tarfile
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import xgboost as xgb

ROUTE = re.compile(r"^/endpoints/([A-Za-z0-9-]{1,63})/invocations$")
MAX_PAYLOAD = 6 * 1024 * 1024


def load_booster(archive):
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        tar.extract("xgboost-model", tmp)
        booster = xgb.Booster()
        booster.load_model(os.path.join(tmp, "xgboost-model"))
        return booster


class Handler(BaseHTTPRequestHandler):
    booster = None
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type, error_type=None):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, error_type, message, **fields):
        body = json.dumps({"message": message, **fields})
        self.reply(status, body, "application/x-amz-json-1.1", error_type)

    def model_error(self, container_status, message):
        """The runtime's wrapping of the container's own error answer."""
        kind = "server" if container_status >= 500 else "client"
        text = f"Received {kind} error ({container_status}) from primary with message \"{message}\""
        return self.error(
            424, "ModelError", text, OriginalStatusCode=container_status, OriginalMessage=message
        )

    def do_GET(self):
        if self.path == "/ping":
            self.reply(200, "", "text/plain")
        else:
            self.error(404, "ValidationError", "no such route")

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        route = ROUTE.match(self.path)
        if not route:
            return self.error(404, "ValidationError", f"no such route: {self.path}")
        name = route.group(1)
        if name.startswith("unavailable-"):
            return self.error(503, "ServiceUnavailable", "the endpoint is unavailable")
        if name.startswith("throttled-"):
            return self.error(429, "ThrottlingException", "rate exceeded")
        if name.startswith("broken-"):
            return self.model_error(400, "unable to evaluate payload provided")
        if name.startswith("crashing-"):
            return self.model_error(500, "worker died")
        if name.startswith("missing-"):
            return self.error(400, "ValidationError", f"Endpoint {name} of account 123456789012 not found.")
        if name.startswith("denied-"):
            message = "User is not authorized to perform: sagemaker:InvokeEndpoint"
            return self.error(403, "AccessDeniedException", message)
        if name.startswith("gateway-"):
            return self.reply(504, "<html>Gateway Timeout</html>", "text/html")
        if length > MAX_PAYLOAD:
            return self.error(413, "ValidationError", "payload over 6 MB")
        content_type = (self.headers.get("Content-Type") or "text/csv").split(";")[0].strip().lower()
        if content_type != "text/csv":
            return self.error(415, "ValidationError", f"content type {content_type} not supported; use text/csv")
        try:
            rows = np.loadtxt(io.StringIO(body.decode()), delimiter=",", dtype=np.float32, ndmin=2)
            scores = self.booster.predict(xgb.DMatrix(rows))
        except Exception as e:  # the container reports any model failure as ModelError
            return self.model_error(400, str(e))
        accept = (self.headers.get("Accept") or "text/csv").split(";")[0].strip().lower()
        if accept == "application/json":
            out = json.dumps({"predictions": [{"score": [float(v) for v in row]} for row in scores]})
            return self.reply(200, out, "application/json")
        lines = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in scores)
        return self.reply(200, lines, "text/csv")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    Handler.booster = load_booster(args.model)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
