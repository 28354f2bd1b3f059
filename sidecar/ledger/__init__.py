"""The lost-reply ledger: usage the store could not take, and metering calls whose reply never came.

Where each piece of the story lives:

- ``journal.py``: the local journal (segments on disk under --data-dir, one per process, merged
  by whichever process locks them), and the request path's two ways in, keep_in_journal (usage
  admitted under ``store_failure: open``, or a response charge not sent) and void_in_journal (a
  503 under ``closed`` whose metering call may have run).
- ``entry.py``: an entry on disk, versioned JSON that says what the request used; the value
  types (UsageEntry, VoidEntry, ScriptEntry for the release before) are in store/port.py, since
  the store's replay takes them.
- ``merger.py``: the three loops of a running sidecar: write the journal every 100 ms, fence the
  billing windows of the customers it has voids for, merge it once a second.
- In the store, not here: a metering call that writes leaves a record naming it, with the steps
  that undo it (store/redis/lua/lib.lua, remember_call; the store's batcher names each call as
  it writes it to a connection); a call sent whose reply was lost raises OutcomeUnknown (errors.py);
  RedisStore.replay (store/redis/store.py) merges an entry with replay.lua, once and only if the
  call it names did not run, and undoes a voided call that ran with void.lua; the fence is
  fence.lua, which close.lua obeys (store/redis/outbox.py).
"""
