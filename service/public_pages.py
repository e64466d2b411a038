"""The two pages a member of the public finds: `/report`, a form that posts to the public reports
endpoint, and `/.well-known/security.txt` (RFC 9116), which points researchers there.

Plain HTML with no script and no external asset (nothing fetched from a CDN, so nothing that could
watch who reports what), served with a content security policy that allows nothing else. The form
posts as text/plain, the one encoding the endpoint takes that a form can send without a script.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

# RFC 9116 §2.5.5: an Expires less than a year ahead; served fresh, it never goes stale.
SECURITY_TXT_VALIDITY = 180 * 86400

PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

REPORT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Report a leaked Supermemory API key</title>
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
textarea, input { width: 100%; box-sizing: border-box; font: 14px monospace; }
textarea { height: 14rem; }
button { font: inherit; padding: .4rem 1.2rem; }
</style>
</head>
<body>
<h1>Report a leaked Supermemory API key</h1>
<p>Found a Supermemory API key (it starts with <code>sm_</code>) in a public place: a repository, a
paste, a package, a log? Paste it here, or the text around it, and it is revoked within seconds. No
account is needed. The key's owner is told that a member of the public reported it.</p>
<form method="post" action="/v1/public/reports" enctype="text/plain">
<p><label for="url">Where you found it (a link, optional)</label><br>
<input id="url" name="url" type="url" placeholder="https://…"></p>
<p><label for="text">The key, or the text that holds it (up to 64 KiB)</label><br>
<textarea id="text" name="text" required></textarea></p>
<p><button type="submit">Report</button></p>
</form>
<p>The answer is always the same (<code>{"status":"received"}</code>), whether or not the text held a
live key: this page cannot be used to test keys. Scripts can post <code>text/plain</code>, or JSON
<code>{"text": "…", "url": "…"}</code>, to <code>/v1/public/reports</code>.</p>
</body>
</html>
"""


def security_txt(base_url: str, contact: str | None, now: float | None = None) -> str:
    """RFC 9116's fields: Contact (the security contact's address first, when set, then this form),
    Expires, Canonical, Policy and Preferred-Languages. `base_url` is the service's public origin."""
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now or time.time()) + SECURITY_TXT_VALIDITY))
    lines = [f"Contact: mailto:{contact}"] if contact else []
    lines += [
        f"Contact: {base_url}/report",
        f"Expires: {expires}",
        f"Canonical: {base_url}/.well-known/security.txt",
        f"Policy: {base_url}/report",
        "Preferred-Languages: en",
    ]
    return "\n".join(lines) + "\n"
