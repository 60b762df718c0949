import { z } from 'zod';

import { Id, Text, Timestamp } from './common.js';

const ProjectFields = {
  name: Text.trim().min(1).max(255),
  description: Text.max(10_000).nullable().optional(),
};

export const ProjectCreate = z.strictObject(ProjectFields).meta({ id: 'ProjectCreate' });
export type ProjectCreate = z.infer<typeof ProjectCreate>;

export const ProjectUpdate = z.strictObject(ProjectFields).partial().meta({ id: 'ProjectUpdate' });
export type ProjectUpdate = z.infer<typeof ProjectUpdate>;

export const ProjectPublic = z
  .object({
    id: Id,
    owner_id: Id,
    name: z.string(),
    description: z.string().nullable(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'ProjectPublic' });

export const ProjectStats = z
  .object({
    project_id: Id,
    threads: z.number().int(),
    agents: z.number().int(),
    runs: z.number().int().describe('Runs on the project\'s threads, finished ones included'),
    active_runs: z.number().int().describe('Runs queued or running'),
    knowledge_folders: z.number().int(),
    knowledge_entries: z.number().int(),
    api_keys: z.number().int().describe('Keys scoped to the project, revoked and expired ones included'),
    active_api_keys: z.number().int().describe('Keys that authenticate: neither revoked nor expired'),
  })
  .meta({ id: 'ProjectStats' });

export const ProjectIdParams = z.object({ project_id: Id });
