import type { FastifyInstance } from 'fastify';
import type { InjectOptions } from 'light-my-request';

/** A fetch that answers from the app in-process (no listening socket), for jose, openid-client, etc. */
export function injectFetch(app: FastifyInstance) {
  return async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const request = new Request(input, init);
    const url = new URL(request.url);
    const body = request.body ? Buffer.from(await request.arrayBuffer()) : undefined;
    const headers: Record<string, string> = {};
    request.headers.forEach((v, k) => {
      headers[k] = v;
    });
    const res = await app.inject({
      method: request.method as InjectOptions['method'],
      url: url.pathname + url.search,
      headers,
      ...(body ? { payload: body } : {}),
    });
    const responseHeaders = new Headers();
    for (const [k, v] of Object.entries(res.headers)) {
      if (v === undefined) continue;
      responseHeaders.set(k, Array.isArray(v) ? v.join(', ') : String(v));
    }
    return new Response(res.statusCode === 204 ? null : res.rawPayload, {
      status: res.statusCode,
      headers: responseHeaders,
    });
  };
}

export const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

/**
 * Every item of a paginated list (`{data, next_cursor}`), following `next_cursor` until it is null;
 * for tests that look for their own rows in a list other files add to on the shared database.
 */
export async function allPages<T>(
  app: FastifyInstance,
  url: string,
  headers: Record<string, string>,
): Promise<T[]> {
  const items: T[] = [];
  let cursor: string | null = null;
  do {
    const page = await app.inject({
      method: 'GET',
      url: `${url}${url.includes('?') ? '&' : '?'}limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`,
      headers,
    });
    if (page.statusCode !== 200) throw new Error(`GET ${url}: ${page.statusCode} ${page.body}`);
    const body = page.json() as { data: T[]; next_cursor: string | null };
    items.push(...body.data);
    cursor = body.next_cursor;
  } while (cursor);
  return items;
}
