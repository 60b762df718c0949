export * from './api-key.js';
export * from './project.js';
export * from './user.js';
