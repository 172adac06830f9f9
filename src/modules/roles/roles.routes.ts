import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import {
  decodeNameCursor,
  encodeNameCursor,
  PaginationQuerySchema,
  pageBy,
  pageOf,
} from '../../lib/pagination.js';
import { PERMISSIONS } from '../../lib/permissions.js';
import { principalOf, requestContext } from '../../plugins/authenticate.js';
import { bearerOrApiKey, PermissionSchema, plainText, problems, timestamp } from '../shared/shared.schema.js';
import { RoleNameSchema } from '../users/users.schema.js';
import type { RoleRow } from './roles.repository.js';
import type { RolesService } from './roles.service.js';

const PermissionListSchema = z
  .array(PermissionSchema)
  .max(200)
  .describe(
    'Permission strings: the catalogue’s (GET /v1/permissions), other services’ (`orders:read`), ' +
      '`resource:*` or `*`',
  )
  .meta({ example: ['users:read', 'audit:read'] });

const RoleSchema = z
  .object({
    name: z.string(),
    description: z.string(),
    permissions: z.array(z.string()),
    builtin: z.boolean(),
    created_at: timestamp(),
    updated_at: timestamp(),
  })
  .meta({ id: 'Role' });

/**
 * A new role's name: not shaped like a UUID, since the audit log's `subject_id` names roles by their
 * name and users, keys and clients by their UUID (a role named as a user's id would put its events in
 * that user's history). Roles named so before are still addressed by their name.
 */
const NewRoleNameSchema = RoleNameSchema.regex(
  /^(?![0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$)/,
  'must not be shaped like a UUID',
);

const CreateRoleBodySchema = z
  .object({
    name: NewRoleNameSchema,
    description: plainText(500).optional(),
    permissions: PermissionListSchema,
  })
  .strict();

const PatchRoleBodySchema = z
  .object({ description: plainText(500).optional(), permissions: PermissionListSchema.optional() })
  .strict();

const RoleParamsSchema = z.object({ role: RoleNameSchema });

const toDto = (r: RoleRow) => ({
  name: r.name,
  description: r.description,
  permissions: r.permissions,
  builtin: r.builtin,
  created_at: r.createdAt.toISOString(),
  updated_at: r.updatedAt.toISOString(),
});

const CATALOGUE = Object.entries(PERMISSIONS).map(([name, description]) => ({ name, description }));
const CatalogueNameSchema = z.enum(CATALOGUE.map((p) => p.name));

/** The catalogue in its declared order (grouped by resource); a page starts after the cursor's name. */
function cataloguePage(query: { limit: number; cursor?: string | undefined }) {
  const after = decodeNameCursor(query.cursor, CatalogueNameSchema);
  const start = after === undefined ? 0 : CATALOGUE.findIndex((p) => p.name === after) + 1;
  const rows = CATALOGUE.slice(start, start + query.limit + 1);
  return pageBy(rows, query.limit, (last) => encodeNameCursor(last.name));
}

const ListQuerySchema = PaginationQuerySchema.strict();

export async function rolesRoutes(app: FastifyInstance, deps: { roles: RolesService; basePath: string }) {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const security = bearerOrApiKey;

  r.get(
    '/v1/permissions',
    {
      config: { permission: 'roles:read' },
      schema: {
        tags: ['roles'],
        operationId: 'listPermissions',
        summary: 'The catalogue of permissions the service knows, in its fixed order (grouped by resource)',
        security,
        querystring: ListQuerySchema,
        response: {
          200: pageOf(z.object({ name: z.string(), description: z.string() })),
          ...problems(400, 401, 403),
        },
      },
    },
    async (request) => {
      const { page, nextCursor } = cataloguePage(request.query);
      return { data: page, next_cursor: nextCursor };
    },
  );

  r.get(
    '/v1/roles',
    {
      config: { permission: 'roles:read' },
      schema: {
        tags: ['roles'],
        operationId: 'listRoles',
        summary: 'List roles, by name',
        security,
        querystring: ListQuerySchema,
        response: { 200: pageOf(RoleSchema), ...problems(400, 401, 403) },
      },
    },
    async (request) => {
      const { page, nextCursor } = await deps.roles.list(request.query);
      return { data: page.map(toDto), next_cursor: nextCursor };
    },
  );

  r.get(
    '/v1/roles/:role',
    {
      config: { permission: 'roles:read' },
      schema: {
        tags: ['roles'],
        operationId: 'getRole',
        summary: 'Read a role',
        security,
        params: RoleParamsSchema,
        response: { 200: RoleSchema, ...problems(400, 401, 403, 404) },
      },
    },
    async (request) => toDto(await deps.roles.get(request.params.role)),
  );

  r.post(
    '/v1/roles',
    {
      config: { permission: 'roles:write' },
      schema: {
        tags: ['roles'],
        operationId: 'createRole',
        summary: 'Create a role (you must hold every permission it gives)',
        security,
        body: CreateRoleBodySchema,
        response: { 201: RoleSchema, ...problems(400, 401, 403, 409) },
      },
    },
    async (request, reply) => {
      const role = await deps.roles.create(request.body, principalOf(request), requestContext(request));
      return reply
        .status(201)
        .header('location', `${deps.basePath}/v1/roles/${encodeURIComponent(role.name)}`)
        .send(toDto(role));
    },
  );

  r.patch(
    '/v1/roles/:role',
    {
      config: { permission: 'roles:write' },
      schema: {
        tags: ['roles'],
        operationId: 'updateRole',
        summary: 'Change a role’s description or permissions (holders get them in their next access token)',
        security,
        params: RoleParamsSchema,
        body: PatchRoleBodySchema,
        response: { 200: RoleSchema, ...problems(400, 401, 403, 404, 409) },
      },
    },
    async (request) =>
      toDto(
        await deps.roles.update(
          request.params.role,
          request.body,
          principalOf(request),
          requestContext(request),
        ),
      ),
  );

  r.delete(
    '/v1/roles/:role',
    {
      config: { permission: 'roles:write' },
      schema: {
        tags: ['roles'],
        operationId: 'deleteRole',
        summary: 'Delete a role (built-in roles cannot be deleted: 409)',
        security,
        params: RoleParamsSchema,
        response: { 204: z.null(), ...problems(400, 401, 403, 404, 409) },
      },
    },
    async (request, reply) => {
      await deps.roles.delete(request.params.role, principalOf(request), requestContext(request));
      return reply.status(204).send(null);
    },
  );
}
