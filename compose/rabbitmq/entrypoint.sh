#!/bin/sh
# Starts RabbitMQ with the `sluice` user's password taken from the rabbitmq_password secret.
#
# Why a wrapper: the definitions file (definitions.json) must carry the user's password, plain or
# as a salted hash, and RabbitMQ reads no password from a file of its own; a password in
# `environment:` would show in `docker inspect`. So this script copies definitions.json into a
# tmpfs with the placeholder replaced by the secret, readable by this container's user only, and
# then runs the broker (the command, `rabbitmq-server`). RabbitMQ hashes a plain `password`
# field itself when it imports the file (as `rabbitmqctl import_definitions` and the HTTP API
# do), and it imports at every boot, so a new secret takes effect with a restart.
set -eu

secret=/run/secrets/rabbitmq_password
template=/etc/sluice/definitions.json
rendered=/tmp/sluice/definitions.json # definitions.local.path in rabbitmq.conf
placeholder=@SLUICE_RABBITMQ_PASSWORD@

if [ ! -r "$secret" ]; then
  echo "sluice-rabbitmq: $secret is missing or unreadable; see compose/secrets/README.md" >&2
  exit 1
fi
password="$(cat "$secret")" # command substitution drops the trailing newline
# The password also goes into the clients' amqp:// URL: keep it to characters that need no
# escaping there or in JSON.
case "$password" in
  "" | *[!A-Za-z0-9._~-]*)
    echo "sluice-rabbitmq: $secret must be 16 or more characters of A-Z a-z 0-9 . _ ~ -" >&2
    exit 1
    ;;
esac
if [ "${#password}" -lt 16 ]; then
  echo "sluice-rabbitmq: $secret must be 16 or more characters of A-Z a-z 0-9 . _ ~ -" >&2
  exit 1
fi
if ! grep -q "$placeholder" "$template"; then
  echo "sluice-rabbitmq: $template has no $placeholder to replace" >&2
  exit 1
fi

umask 077
mkdir -p "$(dirname "$rendered")"
# awk reads the password from its environment, not its arguments (which `ps` would show).
SLUICE_RABBITMQ_PASSWORD="$password" awk -v placeholder="$placeholder" \
  '{ gsub(placeholder, ENVIRON["SLUICE_RABBITMQ_PASSWORD"]); print }' "$template" >"$rendered"
unset password

exec "$@"
