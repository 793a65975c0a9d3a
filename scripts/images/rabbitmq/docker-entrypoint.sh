#!/bin/sh
# Write rabbitmq.conf from the official image's variables, then run the server in the
# foreground (logs to the console).
set -eu
{
  echo "loopback_users = none"
  echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
  echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
  echo "default_vhost = ${RABBITMQ_DEFAULT_VHOST:-/}"
  echo "log.console = true"
  echo "log.console.level = info"
  echo "log.file = false"
} >/etc/rabbitmq/rabbitmq.conf
exec "$@"
