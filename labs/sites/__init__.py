"""The two-site network lab: namespaces joined by a shaped veth link, a delaying relay for latency,
link cuts, and a TLS front for Temporal's dev server. See NOTES.md for figures and commands."""

from labs.sites.netns import LabError, TwoSites, namespaces, rate_bits, sweep, tbf_args

__all__ = ["LabError", "TwoSites", "namespaces", "rate_bits", "sweep", "tbf_args"]
