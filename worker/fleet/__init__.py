"""The fleet's shared API budget, kept in one SQL row (models.budget) that every worker on every host reads.

- `slots`: request slots (`MODELLIX_MAX_RPS`), `take_request_slot` before each API request;
- `places`: places in flight (`MODELLIX_MAX_IN_FLIGHT`) and a submit's turn (`claim_turn`), waited for in place;
- `pause`: the fleet pause after a 429, 401 or 402: written, read, cached per process, waited out, and the
  balance watched during a pause for credit;
- `waiting`: what a request does when the budget has no room now (`OverBudget`, the wait in place);
- `share`: the line's order: which tenant's job goes next (weights, caps) and a job's place in its
  tenant's line (priority, aging), and the claim of the next job.
"""

__all__ = ["pause", "places", "share", "slots", "waiting"]
