import { describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createProject, createUser } from '../helpers/factories.js';

const ctx = useTestApp();

describe('projects', () => {
  it('creates and reads a project', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'First');
    const response = await ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: alice.headers });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ id: project.id, name: 'First', owner_id: alice.user.id });
  });

  it("answers 404 for another user's project", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const response = await ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: bob.headers });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual({ detail: 'Project not found' });
  });
});
