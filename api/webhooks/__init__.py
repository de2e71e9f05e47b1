"""Per-user webhooks: notable session events POSTed (signed, retried, logged) to URLs users register.

``outbox.enqueue`` writes delivery rows in the transaction of the event itself; ``delivery.Deliverer``
(run by each scheduler replica) claims due rows and sends them. See docs/webhooks.md.
"""
