# syntax=docker/dockerfile:1.7
# Build stage: dev dependencies, TypeScript compile of the service (dist/src) and of the operator
# scripts (dist/scripts: migrate, create-admin, rotate-signing-key, verify-migrations, export-openapi).
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY scripts ./scripts
RUN npm run build

# Production dependencies only.
FROM node:20-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

# Final image: compiled JavaScript, production node_modules, migrations; runs as the non-root `node` user.
# Operator scripts run from it too: `docker run --rm --env-file .env paservices-auth node dist/scripts/migrate.js`.
FROM node:20-bookworm-slim
ENV NODE_ENV=production PORT=8000 HOST=0.0.0.0 DATA_DIR=/app/.data
WORKDIR /app
# The code stays root's (readable, not writable, by the process); only the data directory is node's.
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json ./
COPY drizzle ./drizzle
COPY data ./data
RUN mkdir -p /app/.data && chown node:node /app/.data
USER node
EXPOSE 8000
# Liveness, not readiness: Docker's health is what restarters (Swarm, ECS, autoheal) act on, and a
# database outage (readiness 503 on every container) must not restart them all; route traffic on
# /health/ready at the load balancer. The start period covers the migration's retry budget
# (DB_MIGRATION_RETRY_MS, 60 s) while the database comes up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
  CMD node -e "fetch('http://127.0.0.1:'+(process.env.PORT||8000)+'/health/live').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"
# node is PID 1: the kernel gives it no default action for SIGTERM, so the server listens for SIGTERM
# and SIGINT itself from the start of main() (during the migrations too), not only once it is ready.
CMD ["node", "dist/src/server.js"]
