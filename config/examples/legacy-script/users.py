"""List every SuccessFactors user with Python requests, following OData paging.

The script has no certificate code: the sidecar presents the client
certificate. Three ways to point it at the sidecar:

    # https_proxy: unchanged, https:// (the sidecar intercepts; trust.pem from
    # `mtls-sidecar trust show --bundle trust.pem`)
    https_proxy=http://127.0.0.1:8080 REQUESTS_CA_BUNDLE=trust.pem \
        SF_BASE_URL=https://api10.cert.successfactors.com python3 users.py

    # changed base URL: call the sidecar itself
    SF_BASE_URL=http://127.0.0.1:8080 python3 users.py

    # http_proxy: keep the API host, with http:// instead of https://
    http_proxy=http://127.0.0.1:8080 SF_BASE_URL=http://api10.cert.successfactors.com \
        python3 users.py

With an https:// URL requests opens a CONNECT tunnel through https_proxy,
which the sidecar serves for its upstream's names only, doing the TLS with a
certificate the script trusts; with http:// it sends the whole URL to the
proxy, which the sidecar serves for its upstream's host. Either way the
request goes upstream over mTLS.
"""

import os

import requests

BASE = os.environ.get("SF_BASE_URL", "http://127.0.0.1:8080").rstrip("/")


def main() -> None:
    url: str | None = f"{BASE}/odata/v2/User"
    params: dict[str, str] | None = {"$select": "userId,firstName,lastName", "$format": "json"}
    count = 0
    with requests.Session() as session:
        while url:
            response = session.get(url, params=params, timeout=60)
            response.raise_for_status()
            page = response.json()["d"]
            for user in page["results"]:
                print(user["userId"], user["firstName"], user["lastName"])
                count += 1
            # __next is an absolute link: the upstream's own through https_proxy,
            # rewritten by the sidecar to the URL we used otherwise.
            url, params = page.get("__next"), None
    print(f"{count} users")


if __name__ == "__main__":
    main()
