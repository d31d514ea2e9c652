"""A person at a browser, for an OpenID Provider's own login and consent pages (node-oidc-provider's
development interactions): follows redirects, fills each form (login: alice), submits, until the
browser lands on the loopback redirect — which it then loads, as a browser would. Signs in as
$PERSON_LOGIN (default alice). Used as
BROWSER="python person.py %s" by tests/test_independent_op.py."""

import os
import re
import sys
from urllib.parse import urljoin

import requests

session = requests.Session()
url, method, data = sys.argv[1], "GET", None
for _ in range(20):
    resp = session.request(method, url, data=data, allow_redirects=False, timeout=10)
    if resp.is_redirect:
        url, method, data = urljoin(url, resp.headers["Location"]), "GET", None
        continue
    tag = next((t for t in re.findall(r"<form[^>]*>", resp.text) if re.search(r'method="post"', t, re.I)), None)
    form = re.search(r'action="([^"]+)"', tag) if tag else None
    if resp.status_code != 200 or form is None:
        sys.exit(0 if resp.status_code == 200 else 1)  # the last page: "Logged in", "Sign-in Success"
    fields = {}
    for tag in re.findall(r"<input[^>]*>", resp.text):
        name, value = re.search(r'name="([^"]+)"', tag), re.search(r'value="([^"]*)"', tag)
        if name:
            fields[name.group(1)] = value.group(1) if value else ""
    fields.update(login=os.environ.get("PERSON_LOGIN", "alice"), password="anything")
    url, method, data = urljoin(url, form.group(1)), "POST", fields
sys.exit(1)
