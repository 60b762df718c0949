// Loaded only by the test of statement names: a second data layer over `projects` claims the
// statement name `projects_by_ids` again, which must fail when the module loads.
import { projects } from '../../src/models/index.js';

import { ownedCrud } from '../../src/crud/owned.js';
import { projectCrud } from '../../src/crud/project.js';

export const collidingCrud = ownedCrud(projects, projectCrud.policy);
