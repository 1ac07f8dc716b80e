# Build stage: compile the TypeScript sources to dist/.
FROM node:20-alpine AS build
WORKDIR /app
COPY package.json package-lock.json ./
# Install scripts are not needed to compile (they only build test-only native helpers).
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY *.ts ./
COPY plugins ./plugins
COPY routes ./routes
COPY schemas ./schemas
COPY scripts ./scripts
RUN npm run build

# Runtime stage: the compiled service, its migrations and production dependencies only; the
# embedded development database (PGlite, an optional dependency of 27 MB) is left out.
FROM node:20-alpine AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --omit=optional --ignore-scripts --no-audit --no-fund && npm cache clean --force
COPY --from=build /app/dist ./dist
COPY sql ./sql
USER node
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 3000) + '/health/live').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# node is PID 1's direct command, so SIGTERM from `docker stop` reaches the service's graceful shutdown.
CMD ["node", "dist/server.js"]
