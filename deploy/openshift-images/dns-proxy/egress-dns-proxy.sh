#!/bin/sh
exec egress-router "$@"
