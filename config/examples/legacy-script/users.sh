#!/bin/sh
# List the first users of SuccessFactors with plain curl: no --cert, no --key.
#
# Way 0, unchanged https:// through https_proxy (the sidecar intercepts; trust.pem from
# `mtls-sidecar trust show --bundle trust.pem`):
#   https_proxy=http://127.0.0.1:8080 CURL_CA_BUNDLE=trust.pem \
#     SF_BASE_URL=https://api10.cert.successfactors.com ./users.sh
# Way 1, changed base URL: the script calls the sidecar itself.
#   SF_BASE_URL=http://127.0.0.1:8080 ./users.sh
# Way 2, proxy: the script keeps the API host, with http:// instead of https://,
# and curl sends the request to the sidecar (curl reads http_proxy in lower case only).
#   http_proxy=http://127.0.0.1:8080 SF_BASE_URL=http://api10.cert.successfactors.com ./users.sh
set -eu
base="${SF_BASE_URL:-http://127.0.0.1:8080}"
curl --fail --silent --show-error --max-time 60 \
  "$base/odata/v2/User?\$top=${SF_TOP:-5}&\$select=userId,firstName,lastName&\$format=json"
echo
