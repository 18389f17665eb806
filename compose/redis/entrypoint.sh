#!/bin/sh
# Starts Redis with an ACL file written from the redis_password secret (a password on the command
# line would show in `ps` and `docker inspect`). The file lives in a tmpfs, readable by this
# container's user only, and is written anew at every start, so a new secret takes effect with a
# restart.
#
# User `sluice` (Sluice's API and workers): every command except the administrative and
# dangerous ones (FLUSHALL, KEYS, CONFIG, DEBUG, ...), on keys under `sluice:` (SLUICE_NAMESPACE
# is `sluice`; Sluice's Lua scripts touch only keys of its namespace), no Pub/Sub channels.
set -eu

secret=/run/secrets/redis_password
acl=/tmp/sluice/users.acl

if [ ! -r "$secret" ]; then
  echo "sluice-redis: $secret is missing or unreadable; see compose/secrets/README.md" >&2
  exit 1
fi
password="$(cat "$secret")"
# The password also goes into the clients' redis:// URL and into the ACL file, where a space
# would end it: keep it to characters that need no escaping.
case "$password" in
  "" | *[!A-Za-z0-9._~-]*)
    echo "sluice-redis: $secret must be 16 or more characters of A-Z a-z 0-9 . _ ~ -" >&2
    exit 1
    ;;
esac
if [ "${#password}" -lt 16 ]; then
  echo "sluice-redis: $secret must be 16 or more characters of A-Z a-z 0-9 . _ ~ -" >&2
  exit 1
fi

umask 077
mkdir -p "$(dirname "$acl")"
# printf is a shell builtin here: the password never appears in a process's arguments.
{
  printf 'user default off resetpass resetkeys resetchannels -@all\n'
  printf 'user sluice on >%s ~sluice:* resetchannels +@all -@admin -@dangerous\n' "$password"
} >"$acl"
unset password

exec redis-server /etc/sluice/redis.conf --aclfile "$acl"
