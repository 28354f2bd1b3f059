"""Usage to billing: closed windows become summaries in a durable outbox, pushed until a 2xx."""
