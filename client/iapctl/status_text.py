"""`iapctl status` as text: the daemon and a table of its profiles.

One rendering for both ways it is asked for: the daemon serves it (`GET /v1/status?format=text`,
so that a plain `iapctl status` needs neither argparse nor json: ~1.1× Python's start rather than
3×), and `iapctl status` renders the same from the JSON when it has it anyway. Every line goes
through `shown`: it quotes what configs, issuers and the daemon said.
"""

from iapctl.shown import shown


def clipped(text: str, width: int) -> str:
    """At most `width` characters, cut at a word and marked (a LAST ERROR cut mid-word reads badly)."""
    if len(text) <= width:
        return text
    return text[:width - 1].rsplit(" ", 1)[0].rstrip(" ,;:(") + "…"


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def render(status: dict) -> str:
    lines: list[str] = []
    d = status["daemon"]
    managed = f", run by {d['service']}" if d.get("service") else ""
    lines.append(f"iapd {d['version']} (pid {d['pid']}, up {duration(d['uptime'])}{managed}) on {d['socket']}")
    where = " (secrets in the OS keyring)" if d.get("store_kind") == "keyring" else ""
    lines.append(f"config {d['config']}; store {d['store']}{where}")
    if d.get("store_error"):
        lines.append(f"note: the credential store cannot be used: {d['store_error']}")
    if d.get("config_error"):
        lines.append(f"note: the config was changed but cannot be used, the previous one serves: {d['config_error']}")
    for path in d.get("unreadable_stores") or []:
        lines.append(f"note: {path} was unreadable and moved aside; its logins may still be live: "
                     "`iapctl logout --all` revokes and removes it")
    rows = [("PROFILE", "IDENTITY", "STATE", "AUDIENCE", "EXPIRES IN", "NEXT RENEWAL", "LAST ERROR")]
    for p in status["profiles"]:
        error = p.get("last_error") or {}
        audience = p.get("audience") or ("(allowlist)" if p.get("mode") == "allowlist" else "-")
        rows.append((p["name"], p.get("identity") or "-", p["state"], audience,
                     duration(p.get("expires_in")), duration(p.get("next_renewal_in")),
                     clipped(error.get("message") or "-", 70)))
    if len(rows) == 1:
        lines.append(f"no profiles: add one to {d['config']}")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
    for p in status["profiles"]:
        proxy = p.get("proxy")
        if proxy:
            state = proxy["state"] if not proxy.get("error") else f"{proxy['state']}: {proxy['error']}"
            lines.append(f"proxy {p['name']}: {proxy['listen']} → {proxy['upstream']} ({state}, {proxy['served']} served)")
    return "".join(shown(line) + "\n" for line in lines)
