"""A browser that keeps cookies, for `BROWSER="python tests/browser.py %s"`: it follows every
redirect (IAP's sign-in, Google's consent, the app's gatekeeper, an issuer's authorize page, the
loopback listener at the end) and sends back the cookies each host set, as a person's browser
does. It prints the final status and URL on stderr and fails on anything but a 2xx.

curl -L keeps no cookies unless asked: behind IAP it goes round the sign-in until its redirect
limit, which is what a browser that drops cookies would do too.
"""

import http.cookiejar
import sys
import urllib.error
import urllib.request


def main(url: str) -> int:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    try:
        with opener.open(url, timeout=30) as resp:
            print(f"{resp.status} {resp.url}", file=sys.stderr)
            return 0
    except urllib.error.HTTPError as exc:
        print(f"{exc.code} {exc.url}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
