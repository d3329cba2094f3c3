"""Deployments of the omnivox server on serving frameworks (optional extras; nothing here is imported by the plain
server)."""
